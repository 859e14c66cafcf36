################################################################################
#
# python-petitkexec
#
################################################################################

# Built from the petitkexec source tree this br2-external tree lives in
# (contrib/buildroot/../..), not from a download. Buildroot only checks
# hashes of downloaded files and of license files, so there is no
# python-petitkexec.hash: a hash of the working tree would go stale with
# every commit.
# The version must equal [project].version in pyproject.toml
# (tests/test_buildroot_recipes.py checks this and the license).
PYTHON_PETITKEXEC_VERSION = 0.1.0
PYTHON_PETITKEXEC_SITE = $(BR2_EXTERNAL_PETITKEXEC_PATH)/../..
PYTHON_PETITKEXEC_SITE_METHOD = local
# pyproject.toml: build-backend = "setuptools.build_meta"
PYTHON_PETITKEXEC_SETUP_TYPE = setuptools
PYTHON_PETITKEXEC_LICENSE = GPL-2.0-or-later
PYTHON_PETITKEXEC_LICENSE_FILES = COPYING
# Only pyproject.toml, README.md and petitkexec/ are needed to build;
# keep venvs, caches, build output and test data out of the copy.
PYTHON_PETITKEXEC_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--exclude /.cache --exclude /.venv --exclude /build --exclude /dist \
	--exclude /tests --exclude /bench --exclude /.hypothesis \
	--exclude /.mypy_cache --exclude /.ruff_cache --exclude /.pytest_cache \
	--exclude '*.egg-info' --exclude __pycache__

# busybox init's restart action for petitboot (contrib/petitboot/README.md).
define PYTHON_PETITKEXEC_INSTALL_RESTART
	$(INSTALL) -D -m 0755 $(@D)/contrib/petitboot/petitkexec-restart \
		$(TARGET_DIR)/usr/libexec/petitkexec/petitkexec-restart
endef
PYTHON_PETITKEXEC_POST_INSTALL_TARGET_HOOKS += PYTHON_PETITKEXEC_INSTALL_RESTART

$(eval $(python-package))
