"""Test-only helpers shared by several test files: the scripted chat server and the reference
PySceneDetect splitter. Production code never imports them."""
