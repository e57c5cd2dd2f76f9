"""extract subpackage."""
