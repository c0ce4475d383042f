"""Whole-model sites (the ``light`` layout): every neuron of a model as a static site that fits
GitHub Pages, its data read on demand from Parquet files by HTTP range requests.

The layout's rules, in one place: :mod:`.data` (the data files), :mod:`.search` (the word index),
:mod:`.page` (what a neuron page, a layer page and the sitemaps hold), :mod:`.theme` (the theme's page
around a neuron page), :mod:`.build` (the two cached stages and placing them in the site),
:mod:`.vendor` (the Parquet reader from npm). The browser's half is ``assets/light.js`` (with
``rules.js`` and ``figures.js``, tested against the Python rules they mirror).
"""
