"""Task definitions beyond classification (subclasses of :class:`emov2.train.task.Task`)."""
