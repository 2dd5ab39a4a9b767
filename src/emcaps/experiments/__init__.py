"""The paper's experiments as commands: novel viewpoints, adversarial robustness, ablations, and a report
that gathers their results. See `emcaps experiment --help`."""
