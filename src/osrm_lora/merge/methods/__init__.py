"""The merge methods, one module each; every module here registers itself (`..registry.register`) on import.

A new method is one new module in this folder (plus its test): the registry imports them all.
"""
