# Every target is one line; the logic lives in scripts/provision.sh and scripts/build-plugin.sh.
# PLUGIN_NAME may carry a registry and tag (make plugin push PLUGIN_NAME=127.0.0.1:5000/pyvol:dev).
PLUGIN_NAME ?= pyvol
BASE_IMAGE ?= python:3.12-slim
APT_PACKAGES ?=
VENV ?= .venv
export PLUGIN_NAME BASE_IMAGE APT_PACKAGES

.PHONY: provision plugin push install test test-unit lint clean

provision:  ## Debian packages, Docker engine, test images, local registry on 127.0.0.1:5000
	scripts/provision.sh

plugin:  ## build/rootfs + build/config.json, then docker plugin create $(PLUGIN_NAME)
	scripts/build-plugin.sh

push:
	docker plugin push $(PLUGIN_NAME)

install:  ## build the plugin and enable it locally as "pyvol"
	scripts/provision.sh packages engine && PLUGIN_NAME=pyvol scripts/build-plugin.sh --enable

test: $(VENV)/.installed
	scripts/provision.sh && $(VENV)/bin/python -m pytest tests

test-unit: $(VENV)/.installed
	$(VENV)/bin/python -m pytest tests/unit

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/mypy

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV) && $(VENV)/bin/pip install -q -e '.[dev]' && touch $@

clean:
	rm -rf build $(VENV)
