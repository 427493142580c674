"""The npm package `splitkeras-device` (the JavaScript device runtime), as Python package data.

There is no Python code here: the package exists so that `splitkeras export` finds the
runtime it copies into an app bundle (`src/*.js`, `README.md`, `package.json`) through
`importlib.resources.files("mobile_export")`, in a checkout and in an installed wheel alike
(pyproject.toml ships those files as package data).
"""
