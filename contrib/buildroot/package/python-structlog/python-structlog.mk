################################################################################
#
# python-structlog
#
################################################################################

PYTHON_STRUCTLOG_VERSION = 26.1.0
PYTHON_STRUCTLOG_SOURCE = structlog-$(PYTHON_STRUCTLOG_VERSION).tar.gz
PYTHON_STRUCTLOG_SITE = https://files.pythonhosted.org/packages/5e/89/b4a0bcfdf4f71a3dea31379f095929613d7e4528a0996bca6aa964cd0dca
# The build backend is hatchling. SETUP_TYPE = hatch does the same (pep517
# plus host-python-hatchling) but only exists from buildroot 2024.11 on;
# spelled out like this the recipe also builds on 2024.02 (op-build).
PYTHON_STRUCTLOG_SETUP_TYPE = pep517
PYTHON_STRUCTLOG_LICENSE = MIT or Apache-2.0
PYTHON_STRUCTLOG_LICENSE_FILES = LICENSE-MIT LICENSE-APACHE NOTICE
PYTHON_STRUCTLOG_DEPENDENCIES = \
	host-python-hatchling \
	host-python-hatch-fancy-pypi-readme \
	host-python-hatch-vcs

$(eval $(python-package))
