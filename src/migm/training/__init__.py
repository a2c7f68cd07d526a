"""LightningModules that train the embedded default's parts: tokenizer, base MIGM, classifier."""
