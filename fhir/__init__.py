"""SkinBridge's FHIR package.

`fhir` is also the import name of fhir.resources. This package is pkgutil-style so both halves
live under one name: `fhir.resources` (the library) and `fhir.api`, `fhir.mapping`, ... (ours).
It works when the repository root precedes site-packages on sys.path (pytest, the CLI launched
from the checkout, workers started by the CLI) or when SkinBridge is installed non-editable
(both land in the same site-packages folder).
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
