"""The server's one settings object: built once at start-up from ``TEXTGEN_*`` environment variables and
``textgen serve`` flags (flags win), validated there, and passed down. Nothing reads the environment elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.keyring import parse_key, read_keyring_file
from textgen.errors import ConfigError


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEXTGEN_", extra="forbid", validate_default=True)

    # -- what to serve -------------------------------------------------------------------------------------
    bundle: Path | None = Field(None, description="serve this one bundle directory (holding manifest.json)")
    model_repository: Path | None = Field(
        None, description="serve every model in this directory of <model>/<version>/ bundles (newest version each)"
    )
    # -- network -------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to listen on ([::] or 0.0.0.0 for all interfaces)")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port)")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics HTTP port (unset: no metrics endpoint)"
    )
    http_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="OpenAI-compatible HTTP API port (/v1/completions, /v1/models, /health, /health/ready), served "
        "by the same process and engine as gRPC, with the same TLS (unset: no HTTP API; 0: any free port)",
    )
    http_idle_seconds: float = Field(
        30.0,
        gt=0,
        description="the HTTP API's bound on slow clients: a connection whose request line and headers have not all "
        "come this long after it opened (or after its last response) is closed, and a request whose body has not "
        "all come this long after its headers is refused (408)",
    )
    tls_cert_file: Path | None = Field(None, description="server certificate chain (PEM); enables TLS")
    tls_key_file: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) that client certificates must chain to; enables mutual TLS"
    )
    max_message_bytes: int = Field(
        1 << 20,
        ge=1 << 16,
        description="largest gRPC message received or sent (1 MiB holds a 16,384-token prompt of any model with room "
        "to spare; gRPC's own default is 4 MiB); a unary Generate reply over it is refused: stream it instead",
    )
    max_concurrent_rpcs: int = Field(
        1024,
        ge=1,
        description="TextGeneration calls in progress at once, a generate call with n candidates counting n; beyond "
        "it new calls get RESOURCE_EXHAUSTED (health "
        "checks and reflection are not counted, so probes keep working under overload)",
    )
    keepalive_seconds: float = Field(60.0, gt=0, description="HTTP/2 keepalive ping interval")
    max_connection_age_seconds: float = Field(
        300.0,
        gt=0,
        description="close each client connection gracefully (HTTP/2 GOAWAY) after this long, so clients that "
        "balance over replicas (round_robin over a dns:/// name) reconnect and reach new ones; calls in flight "
        "go on for max_connection_age_grace_seconds",
    )
    max_connection_age_grace_seconds: float = Field(
        900.0,
        gt=0,
        description="how long calls in flight on a connection past its age may go on (longer than any stream: "
        "one still running then is cancelled)",
    )
    # -- engine --------------------------------------------------------------------------------------------
    providers: Annotated[list[str], NoDecode] = Field(
        ["auto"],
        description="ONNX Runtime execution providers in priority order (comma-separated), or auto: CUDA then CPU "
        "where an NVIDIA GPU is present (a /dev/nvidiaN device), else CPU, and int8 bundles on CPU. Each provider "
        "named must be active in every session, else the server does not start (see provider_fallback); the ones "
        "really used are logged and reported",
    )
    provider_fallback: bool = Field(
        False,
        description="when a provider named in providers is missing from this ONNX Runtime build or fails to start "
        "(e.g. CUDA without a GPU), log one warning and run on the providers that are active instead of refusing "
        "to start",
    )
    cuda_device_id: int = Field(0, ge=0, description="GPU the CUDA (and TensorRT) provider runs on")
    cuda_memory_limit_bytes: int = Field(
        0, ge=0, description="most GPU memory the CUDA provider's arena may take, in bytes (0: no limit)"
    )
    cuda_graphs: bool = Field(
        False,
        description="CUDA provider: capture each graph call as a CUDA graph and replay it (enable_cuda_graph), "
        "saving kernel launches per step. Needs fixed input shapes, so one captured graph per batch-size bucket, "
        "inputs and outputs bound with IOBinding, every node on CUDA and no concurrent runs of a session",
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: one per core)")
    intra_op_spinning: bool = Field(
        False,
        description="let ONNX Runtime's intra-op threads spin between graph calls: lower latency on cores of their "
        "own; off leaves the cores to the gRPC transport between steps",
    )
    max_batch_size: int = Field(64, ge=1, le=4096, description="sequences advanced together in one step")
    max_queue: int = Field(256, ge=0, description="requests waiting for a batch slot before new ones are refused")
    prefill_chunk_tokens: int = Field(
        512, ge=1, description="prompt tokens run per step, so long prompts do not stall running streams"
    )
    max_prompt_tokens: int = Field(16384, ge=1, description="longest accepted prompt, in tokens")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request leaves it 0")
    max_stop_sequences: int = Field(16, ge=0, description="stop strings per request")
    max_stop_chars: int = Field(256, ge=1, description="longest stop string, in characters")
    max_logit_bias: int = Field(
        300, ge=0, description="logit_bias entries per request, by id and by text together (OpenAI's limit)"
    )
    max_candidates: int = Field(
        16, ge=1, le=256, description="candidates per generate request (n); each holds a batch slot like a request"
    )
    max_beams: int = Field(8, ge=1, le=64, description="beams per beam-search request (num_beams)")
    max_constraint_chars: int = Field(
        4096, ge=1, description="characters of a request's regex, or of its choices together (constrained decoding)"
    )
    max_choices: int = Field(256, ge=1, description="choices per constrained request")
    stream_buffer_tokens: int = Field(
        1024, ge=1, description="tokens generated but not yet sent that a stream may hold (slow readers)"
    )
    max_stream_interval: int = Field(
        16,
        ge=1,
        description="under load, tokens a stream may gather into one message: 1 streams every token always; "
        "otherwise each of N running streams sends every N-th token (about one message per step in all), up to "
        "this; a single stream, and every stream's first token, are sent at once",
    )
    slow_reader_policy: Literal["wait", "cancel"] = Field(
        "wait",
        description="when a stream's buffer is full: pause that sequence (it gives up its batch slot), or end it at "
        "once with finish reason SLOW_READER",
    )
    max_pause_seconds: float = Field(
        60.0,
        gt=0,
        description="a paused stream whose client has read nothing for this long ends with finish reason "
        "SLOW_READER, freeing its state and buffered text",
    )
    score_step_logits: int = Field(
        1 << 18,
        ge=1,
        description="logits (positions x vocabulary) one Score call may compute per engine step, so scoring a long "
        "text with a large vocabulary never stalls running streams for more than a few milliseconds",
    )
    max_predictions: int = Field(
        20, ge=1, le=1000, description="most predictions one Predict call may ask for (num_predictions)"
    )
    max_predict_word_chars: int = Field(
        64,
        ge=1,
        le=1024,
        description="longest word a Predict call may search for a character model (max_word_chars); each character "
        "is one graph call over the call's beam of max(2 x num_predictions, 8) candidates",
    )
    unknown_tokens: Literal["auto", "map", "reject"] = Field(
        "auto",
        description="prompt characters/words outside a model's vocabulary: map to <unk>, reject with "
        "INVALID_ARGUMENT, or auto (reject for character models, map for word models)",
    )
    # -- sessions ------------------------------------------------------------------------------------------
    max_sessions: int = Field(10000, ge=0, description="open sessions, all models together")
    session_memory_bytes: int = Field(1 << 30, ge=0, description="memory all sessions' state may hold")
    session_ttl_seconds: float = Field(600.0, gt=0, description="idle time after which a session expires")
    max_sessions_per_principal: int = Field(
        1000,
        ge=1,
        description="open sessions one client (mTLS identity, x-textgen-principal metadata, else IP address) may "
        "hold; beyond it its own least recently used idle session is evicted, never another client's. It also "
        "gets the same share of session_memory_bytes. Capped at max_sessions (equal to it: no per-client limit)",
    )
    trust_principal_metadata: bool = Field(
        False,
        description="take a call's principal (who owns its sessions and quota) from its x-textgen-principal "
        "metadata when it has no client certificate: only behind a proxy or gateway that sets it and drops what "
        "clients send (off: the peer's IP address, so a client cannot claim another's sessions or rotate names "
        "to escape its quota)",
    )
    snapshot_key_file: Path | None = Field(
        None,
        description="keyring file for state snapshots: one `key-id:key` a line (hex or base64, at least 256 bits; "
        "`textgen keygen` makes one), the first seals new snapshots and every one opens them; replicas that share "
        "it resume each other's snapshots (unset, and no TEXTGEN_SNAPSHOT_KEY: a random key, so snapshots resume "
        "only on this process)",
    )
    snapshot_key: SecretStr | None = Field(
        None,
        description="one snapshot key ([key-id:]key, hex or base64, at least 256 bits), set in the environment "
        "only: a command-line value shows in `ps`; rotating keys needs snapshot_key_file",
        json_schema_extra={"env_only": True},
    )
    snapshot_max_age_seconds: float = Field(
        7 * 86400.0,
        gt=0,
        description="snapshots older than this are refused: a week lets a user come back to a conversation after a "
        "weekend, bounds how long a leaked snapshot can be replayed, and is how long a retired key must stay in "
        "the keyring",
    )
    # -- lifecycle -----------------------------------------------------------------------------------------
    grace_seconds: float = Field(30.0, ge=0, description="on SIGTERM, time running streams get to finish")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log verbosity")

    @field_validator("providers", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("providers")
    @classmethod
    def _auto_alone(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one execution provider, or auto")
        if "auto" in value and len(value) > 1:
            raise ValueError("auto chooses the providers itself: give auto alone, or name the providers")
        return value

    @field_validator("snapshot_key_file")
    @classmethod
    def _snapshot_keyring(cls, value: Path | None) -> Path | None:
        if value is not None:  # read here so that a bad keyring stops the server before its models load
            read_keyring_file(value)
        return value

    @field_validator("snapshot_key")
    @classmethod
    def _snapshot_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_key(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _one_snapshot_key_source(self) -> ServerSettings:
        if self.snapshot_key_file is not None and self.snapshot_key is not None:
            raise ValueError("snapshot_key_file and snapshot_key (TEXTGEN_SNAPSHOT_KEY): give one of them")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> ServerSettings:
        if (self.bundle is None) == (self.model_repository is None):
            raise ValueError("give exactly one of bundle or model_repository")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens {self.default_max_tokens} exceeds max_tokens_limit {self.max_tokens_limit}"
            )
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file {path}")
        if self.metrics_port is not None and self.metrics_port == self.port and self.port != 0:
            raise ValueError(f"metrics_port and port are both {self.port}")
        ports = [p for p in (self.port, self.metrics_port, self.http_port) if p]
        if self.http_port and ports.count(self.http_port) > 1:
            raise ValueError(f"http_port {self.http_port} is also another port of this server")
        return self


def load_settings(**overrides: object) -> ServerSettings:
    """Settings from the environment with ``overrides`` (CLI flags) on top; each bad value is a ``ConfigError``
    naming the setting and its environment variable."""
    try:
        return ServerSettings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            where = f"{field} (TEXTGEN_{field.upper()})" if field else "settings"
            problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("; ".join(problems)) from None
