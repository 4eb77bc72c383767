"""Data: the synthetic domains, image decoding, one reader per input kind, export and quarantine.

- :mod:`tasks.data.synthetic`: the built-in domains, rendered deterministically from a seed.
- :mod:`tasks.data.images`: decoding with limits, conversion to RGB, tensors.
- :mod:`tasks.data.sources`: ImageFolder and WebDataset readers (every stage reads through
  them), class names, export to shards with a quarantine report.
"""
