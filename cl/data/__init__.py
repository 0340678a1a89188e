"""The data bridge: an experience becomes a ``LightningDataModule`` of index views (no copy of the data set)."""

from cl.data.loaders import ExperienceDataModule, RankBatchSampler, make_loader

__all__ = ["ExperienceDataModule", "RankBatchSampler", "make_loader"]
