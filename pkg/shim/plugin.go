package shim

import (
	"context"
	"os"

	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/task"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/containerd/v2/pkg/sys/reaper"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"

	"github.com/snapview/snapview/pkg/backend"
	"github.com/snapview/snapview/pkg/child"
	"github.com/snapview/snapview/pkg/lifecycle"
)

// init registers snapview's task service as the shim's "task" TTRPC plugin.
// It takes the place of runc's task/plugin, which must not be imported as
// well: the two would share the plugin id.
func init() {
	registry.Register(&plugin.Registration{
		Type: plugins.TTRPCPlugin,
		ID:   "task",
		Requires: []plugin.Type{
			plugins.EventPlugin,
			plugins.InternalPlugin,
		},
		InitFn: func(ic *plugin.InitContext) (any, error) {
			pp, err := ic.GetByID(plugins.EventPlugin, "publisher")
			if err != nil {
				return nil, err
			}
			ss, err := ic.GetByID(plugins.InternalPlugin, "shutdown")
			if err != nil {
				return nil, err
			}
			sd := ss.(shutdown.Service)
			inner, err := task.NewTaskService(ic.Context, pp.(shim.Publisher), sd)
			if err != nil {
				return nil, err
			}
			// runc's service set go-runc to wait through the shim's reaper;
			// snapview's own commands (mkfs of a new writable disk) must too,
			// or the SIGCHLD loop can reap them first.
			child.UseReaper(reaper.Default)
			b := backend.New(ic.Properties[plugins.PropertyGRPCAddress])
			b.Preconnect()
			// The connection is shared by every container of the shim; it
			// closes when the shim exits, not when one container goes.
			sd.RegisterCallback(func(context.Context) error { return b.Close() })
			s := newService(inner, lifecycle.New(b))
			// runc's manager starts the shim in the bundle directory of the
			// container that started it, in containerd's task state directory.
			if cwd, err := os.Getwd(); err == nil {
				go sweepOnStart(ic.Context, b, cwd)
			}
			return s, nil
		},
	})
}
