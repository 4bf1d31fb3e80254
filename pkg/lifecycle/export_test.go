package lifecycle

import "time"

// Hooks for the external tests (package lifecycle_test).

// SetAfterStep makes l run f after each setup step.
func SetAfterStep(l *Lifecycle, f func(step string) error) { l.afterStep = f }

// Owned reports whether v is known to own its lease and view.
func Owned(v *View) bool { return v.origin == setUpHere }

// CloseDevice drops v's reference to its block devices (the writable disk
// and any layer disks), as a dying shim would.
func CloseDevice(v *View) error {
	for _, d := range v.layers {
		if err := d.Close(); err != nil {
			return err
		}
	}
	return v.device.Close()
}

// SetCallTimeout bounds each call into containerd by d until the test ends.
func SetCallTimeout(t interface{ Cleanup(func()) }, d time.Duration) {
	old := callTimeout
	callTimeout = d
	t.Cleanup(func() { callTimeout = old })
}
