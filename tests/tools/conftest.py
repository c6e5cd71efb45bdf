"""The data fixtures (tiny CT folders) serve the tool tests too."""

from tests.data.conftest import flat_ct_dir, labeled_ct_dir  # noqa: F401
