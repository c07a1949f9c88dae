"""The model bundle's ``manifest.json`` schema. It belongs to the consumer (the service): the exporter writes
what this schema accepts, and the service validates every bundle against it before serving it.

A bundle is a directory ``<name>/<version>/`` holding ``model.onnx``, ``tokenizer.json`` (Hugging Face
``tokenizers`` format) and ``manifest.json``. Everything needed to serve it from any language is here: the
graph's I/O contract, the tokenizer's level and detokenization rule, the sha256 of every file.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# A model repository serves only version directories named like this: a positive integer without leading zeros,
# the rule Triton's model repositories use. Anything else in a model directory is ignored, in particular the
# staging directory of an export in progress (or killed), which the exporter names with STAGING_PREFIX: a leading
# '.' can never match, so a half-written bundle is never served, whatever its contents look like.
VERSION_DIR = re.compile(r"[1-9][0-9]*")
STAGING_PREFIX = "."
STAGING_SUFFIX = ".partial"


def is_version_dir_name(name: str) -> bool:
    return VERSION_DIR.fullmatch(name) is not None


def plain_file_name(name: str) -> str:
    """``name`` if it names a file directly inside the bundle directory; ValueError otherwise. A manifest is
    input: a name like ``../../etc/passwd`` or ``/etc/passwd`` must not make the loader read outside the bundle."""
    if not name or name in (".", ".."):
        raise ValueError(f"file name {name!r} is not a file name")
    if "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"file name {name!r} must be a plain name inside the bundle (no path separators)")
    if name == MANIFEST:
        raise ValueError(f"file name {name!r} is the manifest itself")
    return name


PlainFileName = Annotated[str, AfterValidator(plain_file_name)]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

DETOKENIZE_RULES = {
    "char": "concatenate token texts; <unk> is shown as U+FFFD",
    "word": "join tokens with single spaces; <eos> is a line break with no space next to it; <unk> is shown as is",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str
    dtype: Literal["int64", "float32", "float16"]
    shape: list[int | str] = Field(description="fixed sizes as integers, dynamic axes by name")


class ModelInfo(_Strict):
    cell: Literal["lstm", "gru", "rnn_tanh", "rnn_relu"]
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    embedding_size: int = Field(ge=1)
    vocab_size: int = Field(ge=2)
    tie_weights: bool
    parameters: int = Field(ge=1)


class TokenizerInfo(_Strict):
    file: PlainFileName = "tokenizer.json"
    level: Literal["char", "word"]
    vocab_size: int = Field(ge=2)
    unk_token: str
    eos_token: str | None
    start_token: str = Field(description="token fed before generation when a prompt is empty")
    detokenize: str


class GraphInfo(_Strict):
    file: PlainFileName = "model.onnx"
    opset: int
    precision: Literal["fp32", "int8", "fp16"]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    state: list[str] = Field(description="recurrent state inputs; each has an output named <state>_out")


class QualityChange(_Strict):
    """How a derived bundle (int8, fp16) compares with the fp32 model on held-out text."""

    reference_precision: str
    split: str
    tokens: int
    reference_loss: float
    loss: float
    loss_delta: float
    reference_metric: float
    metric: float
    metric_name: Literal["bpc", "perplexity"]
    top1_agreement: float


class Verification(_Strict):
    max_abs_logit_diff: float
    continuation_max_abs_diff: float
    tolerance: float | None = Field(
        description="absolute parity bound vs torch: 1e-4 for fp32; for fp16 1 % of the largest |value| torch "
        "computed in the run (at least 0.01); None for an int8 graph, which is judged by its measured quality "
        "change instead"
    )
    batch_sizes: list[int]
    lengths: list[int]


class Provenance(_Strict):
    data: str
    steps: int
    epochs: int
    val_loss: float | None
    val_bpc: float | None = None
    val_perplexity: float | None = None
    checkpoint_sha256: str
    exported_at: str
    source_revision: str | None
    textgen_version: str
    torch_version: str
    onnx_version: str


class Manifest(_Strict):
    format_version: int
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelInfo
    tokenizer: TokenizerInfo
    graph: GraphInfo
    provenance: Provenance
    verification: Verification
    quality: QualityChange | None = None
    files: dict[PlainFileName, Sha256Hex] = Field(
        description="sha256 (lowercase hex) of every other file in the bundle, by plain file name: the bundle "
        "directory holds exactly these files and the manifest"
    )
