"""Checkpoint -> verified ONNX model bundle (model.onnx, tokenizer.json, manifest.json). Filled by the
exporter work; the service reads bundles and never imports this package."""
