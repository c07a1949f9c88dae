"""The gRPC generation service on ONNX Runtime. It reads model bundles and never imports torch, ``training``
or ``exporter``."""
