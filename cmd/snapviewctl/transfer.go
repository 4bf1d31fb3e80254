package main

import (
	"context"
	"fmt"

	"github.com/snapview/snapview/snapshots"
)

func snapshotPush(ctx context.Context, c *snapshots.Client, args []string) error {
	return fmt.Errorf("%w: snapshot push is not there yet", errUsage)
}

func snapshotPull(ctx context.Context, c *snapshots.Client, args []string) error {
	return fmt.Errorf("%w: snapshot pull is not there yet", errUsage)
}
