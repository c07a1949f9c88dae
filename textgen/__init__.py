"""textgen: recurrent language models, trained with PyTorch and served with ONNX Runtime over gRPC.

This package holds what the offline side (``training``, ``exporter``) and the serving side (``service``)
share: the tokenizer, the sampler, the domain errors and the command line. It never imports torch.
"""

__version__ = "0.1.0"
