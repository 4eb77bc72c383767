"""Data: the synthetic domains, image decoding, one reader per input kind, export and quarantine.

- :mod:`tasks.data.synthetic`: the built-in domains, rendered deterministically from a seed.
- :mod:`tasks.data.images`: decoding with limits, conversion to RGB, tensors.
- :mod:`tasks.data.readers`: ImageFolder and WebDataset readers; every stage reads through them.
- :mod:`tasks.data.export`: samples to WebDataset shards, with reports.
- :mod:`tasks.data.quarantine`: what a reader or an export skipped, converted and counted.
"""
