"""The offline half: corpora, tokenization, the recurrent model, training, evaluation and the torch reference
sampler. Modules that need torch import it themselves; importing this package does not."""
