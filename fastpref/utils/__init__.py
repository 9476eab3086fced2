"""Small shared utilities: the one validation dialect (``validation``), allocation tracking for tests and the
CPU benchmark (``memory``), the torch.compile graph break (``compile``)."""
