"""Command-line entry points: thin wrappers that parse flags and call the library."""
import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter without '(default: None)': an option with no default says nothing
    rather than a Python None no user can type (its help says what leaving it out means)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)
