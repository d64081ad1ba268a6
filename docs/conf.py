"""Sphinx configuration for xllm's documentation (built with -W in the test suite)."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "xllm"
author = "the xllm developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
autodoc_member_order = "bysource"
autodoc_mock_imports = ["torch", "transformers"]
html_theme = "alabaster"
exclude_patterns = ["_build"]
