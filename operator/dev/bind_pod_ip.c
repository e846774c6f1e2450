/* Preloaded into every process the node agent starts: a bind() to the unspecified address
 * (0.0.0.0 or ::) binds the pod's own loopback address ($ORCA_DEV_POD_IP) instead, so two pods
 * can both listen on port 8000 on one machine, each on its own 127.0.x.y, as pods do on a node. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind) real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    const char *pod_ip = getenv("ORCA_DEV_POD_IP");
    if (pod_ip && addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in v4;
        memcpy(&v4, addr, sizeof v4);
        if (v4.sin_addr.s_addr == htonl(INADDR_ANY) && inet_pton(AF_INET, pod_ip, &v4.sin_addr) == 1)
            return real_bind(fd, (const struct sockaddr *)&v4, sizeof v4);
    } else if (pod_ip && addr && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 v6;
        char mapped[64];
        memcpy(&v6, addr, sizeof v6);
        snprintf(mapped, sizeof mapped, "::ffff:%s", pod_ip);
        if (IN6_IS_ADDR_UNSPECIFIED(&v6.sin6_addr) && inet_pton(AF_INET6, mapped, &v6.sin6_addr) == 1) {
            int off = 0;  /* a v4-mapped address needs a dual-stack socket */
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
            return real_bind(fd, (const struct sockaddr *)&v6, sizeof v6);
        }
    }
    return real_bind(fd, addr, len);
}
