/**
 * The struct layouts and flag values of src/sys/unix_socket.ts, inet_socket.ts, eventfd.ts and
 * shared_memory.ts
 * agree with the C headers, compiled by gcc where it is at hand (skipped, said so, otherwise).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import * as ev from "../../src/sys/eventfd.ts";
import * as inet from "../../src/sys/inet_socket.ts";
import * as shm from "../../src/sys/shared_memory.ts";
import * as us from "../../src/sys/unix_socket.ts";

const expected: Record<string, number> = {
  "sizeof(struct sockaddr_un)": us.SOCKADDR_UN_SIZE,
  "offsetof(struct sockaddr_un, sun_path)": 2,
  "sizeof(((struct sockaddr_un *)0)->sun_path) - 1": us.MAX_SOCKET_PATH,
  "sizeof(struct msghdr)": us.MSGHDR_SIZE,
  "offsetof(struct msghdr, msg_name)": us.MSGHDR_name,
  "offsetof(struct msghdr, msg_namelen)": us.MSGHDR_namelen,
  "offsetof(struct msghdr, msg_iov)": us.MSGHDR_iov,
  "offsetof(struct msghdr, msg_iovlen)": us.MSGHDR_iovlen,
  "offsetof(struct msghdr, msg_control)": us.MSGHDR_control,
  "offsetof(struct msghdr, msg_controllen)": us.MSGHDR_controllen,
  "offsetof(struct msghdr, msg_flags)": us.MSGHDR_flags,
  "sizeof(struct iovec)": us.IOVEC_SIZE,
  "sizeof(struct cmsghdr)": us.CMSGHDR_SIZE,
  "CMSG_LEN(0)": us.CMSGHDR_SIZE,
  "sizeof(struct pollfd)": us.POLLFD_SIZE,
  "sizeof(struct epoll_event)": ev.EPOLL_EVENT_SIZE,
  "offsetof(struct epoll_event, events)": ev.EPOLL_EVENT_events,
  "offsetof(struct epoll_event, data)": ev.EPOLL_EVENT_data,
  AF_UNIX: us.AF_UNIX,
  SOCK_STREAM: us.SOCK_STREAM,
  SOCK_NONBLOCK: us.SOCK_NONBLOCK,
  SOCK_CLOEXEC: us.SOCK_CLOEXEC,
  SOL_SOCKET: us.SOL_SOCKET,
  SCM_RIGHTS: us.SCM_RIGHTS,
  MSG_TRUNC: us.MSG_TRUNC,
  MSG_CTRUNC: us.MSG_CTRUNC,
  MSG_NOSIGNAL: us.MSG_NOSIGNAL,
  MSG_CMSG_CLOEXEC: us.MSG_CMSG_CLOEXEC,
  ECONNREFUSED: us.ECONNREFUSED,
  POLLIN: us.POLLIN,
  POLLOUT: us.POLLOUT,
  POLLERR: us.POLLERR,
  POLLHUP: us.POLLHUP,
  POLLNVAL: us.POLLNVAL,
  EFD_SEMAPHORE: ev.EFD_SEMAPHORE,
  EFD_NONBLOCK: ev.EFD_NONBLOCK,
  EFD_CLOEXEC: ev.EFD_CLOEXEC,
  EPOLL_CLOEXEC: ev.EPOLL_CLOEXEC,
  EPOLLIN: ev.EPOLLIN,
  EPOLLOUT: ev.EPOLLOUT,
  EPOLLERR: ev.EPOLLERR,
  EPOLLHUP: ev.EPOLLHUP,
  EPOLLRDHUP: ev.EPOLLRDHUP,
  "(unsigned)EPOLLET": ev.EPOLLET,
  "sizeof(struct addrinfo)": inet.ADDRINFO_SIZE,
  "offsetof(struct addrinfo, ai_flags)": inet.ADDRINFO_flags,
  "offsetof(struct addrinfo, ai_family)": inet.ADDRINFO_family,
  "offsetof(struct addrinfo, ai_socktype)": inet.ADDRINFO_socktype,
  "offsetof(struct addrinfo, ai_protocol)": inet.ADDRINFO_protocol,
  "offsetof(struct addrinfo, ai_addrlen)": inet.ADDRINFO_addrlen,
  "offsetof(struct addrinfo, ai_addr)": inet.ADDRINFO_addr,
  "offsetof(struct addrinfo, ai_next)": inet.ADDRINFO_next,
  AF_INET: inet.AF_INET,
  AF_INET6: inet.AF_INET6,
  MFD_CLOEXEC: shm.MFD_CLOEXEC,
  MFD_ALLOW_SEALING: shm.MFD_ALLOW_SEALING,
};

Deno.test("socket, epoll, eventfd and memfd layouts and flags agree with the C headers", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "vstor-layout-" });
  try {
    const lines = Object.keys(expected).map((expr) =>
      `  printf("%s=%llu\\n", ${JSON.stringify(expr)}, (unsigned long long)(${expr}));`
    );
    const program = `#define _GNU_SOURCE
#include <stdio.h>
#include <stddef.h>
#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/uio.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <netdb.h>
int main(void) {
${lines.join("\n")}
  return 0;
}
`;
    const source = join(dir, "layout.c"), binary = join(dir, "layout");
    Deno.writeTextFileSync(source, program);
    let compiled;
    try {
      compiled = await new Deno.Command("gcc", { args: ["-o", binary, source] }).output();
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) {
        console.log("skipped: no gcc");
        return;
      }
      throw e;
    }
    assert.ok(compiled.success, new TextDecoder().decode(compiled.stderr));
    const out = new TextDecoder().decode((await new Deno.Command(binary).output()).stdout);
    const actual: Record<string, number> = {};
    for (const line of out.trim().split("\n")) {
      const at = line.lastIndexOf("=");
      actual[line.slice(0, at)] = Number(line.slice(at + 1));
    }
    assert.deepEqual(actual, expected);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("the page size the mappings assume is this machine's", () => {
  const out = new Deno.Command("getconf", { args: ["PAGESIZE"] }).outputSync();
  assert.equal(Number(new TextDecoder().decode(out.stdout).trim()), shm.PAGE_SIZE);
});
