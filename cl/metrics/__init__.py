from cl.metrics.accuracy import AccuracyMatrix

__all__ = ["AccuracyMatrix"]
