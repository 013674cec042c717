from covid_cxr.cli import entry

entry()
