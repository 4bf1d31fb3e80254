//go:build !snapview_faults

// Package fault marks the points where a test build of the shim can be made
// to crash (SIGKILL itself), so that the end-to-end crash matrix can check
// that every path cleans up after a shim that died at any step. In the
// released binary, built without the snapview_faults tag, Point does
// nothing and nothing else of the mechanism is compiled in.
package fault

// Point marks the fault point named name, reached for container id.
func Point(name, id string) {}
