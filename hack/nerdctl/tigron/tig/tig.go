// Package tig declares the test interface nerdctl's non-test helpers are
// written against. nerdctl's binary never calls them; the interface only
// has to exist for the build (see ../go.mod).
package tig

// T is what nerdctl's pkg/testutil uses of a *testing.T.
type T interface {
	Helper()
	Log(args ...any)
	FailNow()
}
