"""pytest-benchmark suites of es_kernels, the end-to-end ViT step benchmark and the report command.

Not collected by the default ``python -m pytest`` (testpaths = tests); see benchmarks/common.py for the commands.
"""
