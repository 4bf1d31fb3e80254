package lifecycle

// Hooks for the external tests (package lifecycle_test).

// SetAfterStep makes l run f after each setup step.
func SetAfterStep(l *Lifecycle, f func(step string) error) { l.afterStep = f }

// Owned reports whether v is known to own its lease and view.
func Owned(v *View) bool { return v.owned }

// CloseDevice drops v's reference to its block device, as a dying shim
// would.
func CloseDevice(v *View) error { return v.device.Close() }
