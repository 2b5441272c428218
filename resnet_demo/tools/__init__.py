"""Measuring the product: the benchmark and the load test. Never imported by the product.
"""
