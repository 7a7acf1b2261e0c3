"""Sample-quality metrics: FID and Inception Score, and the digits classifier metric.

`inception` holds the FID InceptionV3, `fid` the streaming statistics and the
distances, `reference_stats` the command that computes reference statistics,
`digits_metric` the classifier metric that runs on a laptop.
"""
