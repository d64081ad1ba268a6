"""Sphinx configuration for xllm's documentation (built with -W in the test suite)."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath(os.path.join("..", "tools")))  # plot_benchmarks for the figures

project = "xllm"
author = "the xllm developers"
# matplotlib's plot directive draws the benchmark figures at build time (the docs extra)
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "matplotlib.sphinxext.plot_directive"]
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 100)]
autodoc_member_order = "bysource"
autodoc_mock_imports = ["torch", "transformers"]
html_theme = "alabaster"
exclude_patterns = ["_build"]
