"""The built-in demos: generated instruction tasks, preference pairs and the demo runners.

Nothing in the core imports these; the demo data source and the demo configs name them."""
