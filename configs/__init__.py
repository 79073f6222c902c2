"""The built-in recipes (YAML); installed as ``flexast.configs`` so that ``--config NAME`` finds them in a wheel."""
