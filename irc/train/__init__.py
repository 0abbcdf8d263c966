"""Training stages of a routed model: LFF fit, router init, router training, LoRA."""
