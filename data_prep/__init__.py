"""``python -m data_prep``: turn image-text pairs into the WebDataset shards of DESIGN §3.

Commands: ``shard`` (sources -> shards + manifest + ledger), ``verify``, ``stats`` and ``synth``
(the synthetic scenes corpus). See ``python -m data_prep --help``.
"""

__version__ = "0.1.0"
