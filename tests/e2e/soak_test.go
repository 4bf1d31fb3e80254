package e2e

import (
	"testing"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// TestSoakShort is a short version of `make soak`: 50 cycles sequential and
// in 8 streams, 50 containers in one pod-grouped shim, 16 creates at once.
// No cycle may fail, the pod shim's open files and goroutines must stay
// level, and the leak check (registered by setup) must find nothing.
func TestSoakShort(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	cfg := harness.SoakConfig{Runtime: snapviewRT, Image: testImageID, Cycles: 50, Streams: 8, PodContainers: 50, SampleEvery: 10, Parallel: 16}
	rep, err := d.Soak(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	var out testWriter
	rep.Print(&out, cfg)
	t.Log(out.String())
	for _, f := range rep.Failures {
		t.Error(f)
	}
	if flat, how := rep.Flat(); !flat {
		t.Errorf("the pod shim grew: %s", how)
	}
}

// testWriter collects output for t.Log.
type testWriter struct{ harness.SafeBuffer }

// TestSoakFlat checks the soak's judgement on samples: a transient rise
// of the kind a loaded machine shows (CI, 2026-12-01) is level, a leak of
// one goroutine or file per container is not.
func TestSoakFlat(t *testing.T) {
	samples := func(fds, gs []int) *harness.SoakReport {
		r := &harness.SoakReport{}
		for i := range fds {
			r.Pod = append(r.Pod, harness.ShimSample{Cycle: 10 * (i + 1), FDs: fds[i], Goroutines: gs[i]})
		}
		return r
	}
	for _, tc := range []struct {
		name    string
		fds, gs []int
		flat    bool
	}{
		{"level", []int{21, 21, 22, 21, 21}, []int{28, 27, 27, 27, 27}, true},
		{"events in flight under load", []int{19, 20, 21, 19, 21}, []int{28, 28, 32, 32, 34}, true},
		{"a goroutine per container", []int{21, 21, 21, 21, 21}, []int{28, 38, 48, 58, 68}, false},
		{"a file per container", []int{21, 31, 41, 51, 61}, []int{28, 28, 28, 28, 28}, false},
	} {
		if flat, how := samples(tc.fds, tc.gs).Flat(); flat != tc.flat {
			t.Errorf("%s: flat %v (%s), want %v", tc.name, flat, how, tc.flat)
		}
	}
}
