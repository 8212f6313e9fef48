"""``python -m data_prep``: turn image-text pairs into the WebDataset shards of DESIGN §3.

Commands: ``shard`` (sources -> shards + manifest + ledger), ``verify``, ``stats`` and ``synth``
(the synthetic scenes corpus). See ``python -m data_prep --help``. Each is also a function::

    from data_prep import shard, synth

    source = synth("data/synth", 5000, seed=0)
    shard([f"jsonl:{source}"], "data/shards", shard_size=1000)

The shard format itself (what ``pipeline.data`` reads) is ``data_prep.schema`` and
``data_prep.shard_index``.
"""

from data_prep.commands import shard, stats, synth, verify
from data_prep.errors import CommandError

__version__ = "0.1.0"

__all__ = ["CommandError", "shard", "stats", "synth", "verify"]
