// containerd 2.x's snapshotter conformance suite (core/snapshots/testsuite) against
// containerd-sealfs-grpc, through containerd's proxy snapshotter client: exactly the path
// containerd takes to a [proxy_plugins] snapshotter. Each case gets a fresh daemon whose root
// is the directory the suite hands in.
//
// Built in GOPATH mode against Debian's packaged containerd source (no module downloads):
//
//	GO111MODULE=off GOPATH=$PWD/tests/conformance:$GO2/usr/share/gocode GOROOT=$GO2/usr/lib/go-1.27 \
//	  SEALFS_DAEMON=$PWD/target/debug/containerd-sealfs-grpc \
//	  $GO2/usr/lib/go-1.27/bin/go test -v sealfs.test/conformance2
//
// with $GO2 the Go toolchain and containerd 2.x source that scripts/install-deps.sh unpacks
// from Debian's unstable suite; scripts/test.sh runs it.
package conformance2

import (
	"context"
	"os"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"

	"sealfs.test/daemon"
)

func TestSealfsSnapshotter(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("the suite mounts overlayfs: run as root")
	}
	// The suite keys one expectation on the snapshotter's name: renaming a directory of a
	// lower layer fails with EXDEV on overlayfs (no redirect_dir, as containerd's own
	// overlayfs snapshotter mounts it), so it skips that step for "overlayfs". sealfs's
	// ordinary snapshots are exactly such overlayfs snapshots, so it runs under that name;
	// the name is used for nothing else (the proxy client below is named "sealfs").
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		conn, stop, err := daemon.Start(ctx, root)
		if err != nil {
			return nil, nil, err
		}
		return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "sealfs"), stop, nil
	})
}
