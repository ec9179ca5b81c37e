"""The built-in security self-scan: probes a running instance over HTTP for the pipeline's promises.

`{{ cookiecutter.package_name }}-scan --url URL --token T` (see the README's "Security self-scan"). One module
per check group; `runner` parses the command line, runs the checks in order and prints the report.
"""
