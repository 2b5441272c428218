"""What the page shows: every picture and chart, the page's typed results, the model registry, export.

Asks the core's Explorer for results and turns them into pictures and words; never touches a model,
a device or a tensor's device.
"""
