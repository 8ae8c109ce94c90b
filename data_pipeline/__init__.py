"""Data path: sources -> WebDataset shards -> split/shuffled reader -> DALI (or PIL) augmented views.

- ``data_pipeline.shards``: ``write_shards``, ``ensure_digits_shards``, ``list_shards``, ``read_manifest``
- ``data_pipeline.loader``: ``make_train_stream`` / ``TrainStream`` (what the trainer consumes), ``read_epoch``
- ``data_pipeline.views``: ``AugmentConfig``
- ``data_pipeline.dali``: the only module importing ``nvidia.dali``; ``data_pipeline.cpu``: the PIL reference

Importing this package imports neither DALI nor webdataset.
"""
