"""The command line: `psframe train`, `psframe bench` and `psframe report`, and their options."""
from .app import (build_parser, load_model_file, main, parse_data, parse_model, resolve,
                  save_weights)

__all__ = ["main", "build_parser", "resolve", "parse_model", "parse_data", "load_model_file",
           "save_weights"]
