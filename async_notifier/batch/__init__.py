"""A batch from start to end: each record delivered, each fate decided, the batch reported."""
