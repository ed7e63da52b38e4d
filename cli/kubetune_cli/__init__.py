"""kubetune's command line: `kubetune run/validate/render/crd/docs`. Not in either image."""
