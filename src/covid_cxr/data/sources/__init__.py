"""One adapter per dataset; each returns manifest rows (see :mod:`covid_cxr.data.manifest`)."""

from covid_cxr.data.sources.covid_chestxray import read_covid_chestxray
from covid_cxr.data.sources.covidx import read_covidx
from covid_cxr.data.sources.folder import folder_specs, parse_folder_spec, read_folder
from covid_cxr.data.sources.rsna import read_rsna

__all__ = ["folder_specs", "parse_folder_spec", "read_covid_chestxray", "read_covidx", "read_folder", "read_rsna"]
