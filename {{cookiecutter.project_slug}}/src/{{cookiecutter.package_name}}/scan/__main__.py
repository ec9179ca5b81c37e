"""`python -m {{ cookiecutter.package_name }}.scan`, the same as the `{{ cookiecutter.package_name }}-scan` script."""

from .runner import main

raise SystemExit(main())
