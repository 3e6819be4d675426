"""Test and demo fixtures that ship with the package: tiny random models built locally.

Not a model family and not used by the service itself; tests, the demo, the benchmarks and
`lathe models make-tiny` build their models here so nothing is downloaded.
"""
